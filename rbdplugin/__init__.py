"""rbdplugin: a Docker volume plugin daemon for Ceph RBD block volumes."""

# The installed distribution's metadata is authoritative (rbdplugin --version reads it);
# this is the fallback when running from a source checkout.
__version__ = "0.1.0"
