"""Sharding: the logical-axis rule table, the Partitioner (mesh, shardings, jit) and
multi-host start-up."""
