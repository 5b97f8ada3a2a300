"""From images to feature rows: extraction (``extraction``: batches, the content-addressed
feature cache and its entries, sharded under torchrun), the decode cache (``decode_cache``:
decoded and resized images kept on disk), the checksummed entry helpers both caches share
(``entries``), the image loading both run (``loading``), the speed options (``accel``:
autocast, channels-last, compile) and the streamed rows protocols read (``stream``).
Imports data and backbones, never protocols or anything above."""
