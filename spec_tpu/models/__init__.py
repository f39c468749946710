"""The one decoder and what it is made of: configs, layers, caches."""
