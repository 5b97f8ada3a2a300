"""The small shared helpers every room uses, importing nothing of ssl-eval above them: errors
(``UserError``, one-line messages), YAML-to-dataclass config (``config``), registries
(``registry``), the logger, device and seeding (``runtime``), provenance (code hash, library
versions, the machine), statistics (intervals and tests), atomic files, locks and checksummed
files (``files``), and the torch.distributed primitives (``distributed``) that extraction,
protocols and the trainer share under torchrun."""
