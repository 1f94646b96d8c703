"""Where bytes live: one :class:`~sdk.stores.store.Store` over any object store, with one retry loop, CRC32C on
every object and conditional create.

:mod:`sdk.stores.store` is what the rest of podtrain uses; the stores themselves (local disk, any fsspec file
system, S3, GCS) are private modules behind :mod:`sdk.stores.protocol`, found by scheme in :mod:`sdk.stores.registry`.
Nothing here imports torch.
"""
