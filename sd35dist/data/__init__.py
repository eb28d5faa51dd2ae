"""Latent cache: buckets, captions, shards, manifests, and the stream that reads them."""
