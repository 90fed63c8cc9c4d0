"""icbd-cache: a boot-path caching NBD server for iCBD diskless workstations."""

__version__ = "0.1.0"
