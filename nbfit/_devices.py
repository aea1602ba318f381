"""Placement of gene chunks on the local devices.

The gene axis of every per-gene array is sharded over all local devices of the default
backend (a 1-d mesh named ``genes``); designs and other shared arrays are replicated.
Each solver loop and the evaluation run on every device's share on its own (``shard_map``
in :mod:`nbfit._loop`). On a CPU, JAX shows one device unless the process starts with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (one device per core to use).
"""

import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def n_devices():
    """Number of local devices of the default backend."""
    return jax.local_device_count()


@functools.cache
def mesh():
    """1-d mesh ``genes`` over the local devices, or None with a single device."""
    if n_devices() == 1:
        return None
    return Mesh(np.array(jax.local_devices()), ("genes",))


def put_genes(array):
    """Place ``array`` (genes on the first axis) sharded over the local devices."""
    genes = mesh()
    if genes is None:
        return jax.device_put(array)
    return jax.device_put(array, NamedSharding(genes, PartitionSpec("genes")))


def put_shared(array):
    """Place ``array`` replicated on every local device."""
    genes = mesh()
    if genes is None:
        return jax.device_put(array)
    return jax.device_put(array, NamedSharding(genes, PartitionSpec()))
