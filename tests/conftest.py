"""Simulated 8-device CPU platform for every test; must run before any JAX op initialises a backend."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
