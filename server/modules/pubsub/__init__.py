"""Publish-subscribe (XEP-0060): one engine (engine.py), served at every account's bare JID as
PEP (pep.py, XEP-0163) and at pubsub.<domain> as a pubsub service (service.py); with [cluster],
cluster.py shares their caches and +notify interests between nodes."""
