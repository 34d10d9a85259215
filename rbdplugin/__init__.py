"""rbdplugin: a Docker volume plugin daemon for Ceph RBD block volumes."""

__version__ = "0.1.0"
