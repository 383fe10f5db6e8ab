"""nbproc: turn a live Jupyter notebook into a cluster.tools processor."""

from .cluster import DROP, Cluster, ClusterDefinitionError

__all__ = ["DROP", "Cluster", "ClusterDefinitionError"]
__version__ = "0.1.0"
