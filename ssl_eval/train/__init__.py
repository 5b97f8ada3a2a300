"""The bundled SSL trainer: ``ssl-eval train``. Writes checkpoints that ssl_eval.backbones
reads; imports backbones/, never the other way round."""
