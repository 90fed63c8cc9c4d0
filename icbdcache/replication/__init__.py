"""Replication: a master that publishes iMI versions and replicas (site caches) that pull
them, full or as deltas (the chunks a replica does not hold), over HTTP(S). See
docs/replication.md; the wire format is :mod:`icbdcache.replication.wire`."""
