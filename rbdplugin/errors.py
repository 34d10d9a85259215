"""The one error tree of rbdplugin.

Every failure that can reach an operator or Docker is one of these. Lower
libraries (rados, rbd, openstacksdk, subprocess exit codes, kernel messages) are translated
into them at the layer boundary that calls those libraries; the HTTP layer turns
any of them into ``{"Err": str(error)}``. Messages say what failed, on which
volume, and what to do.

    RbdPluginError
    ├── ConfigError            the config file is missing, unreadable or invalid
    ├── InvalidRequest         the request itself is malformed (body, JSON, shape)
    │   └── InvalidArgument    a name, size or option value is not acceptable
    ├── NotFound               the volume does not exist
    ├── Conflict               exists with other options, or another owner holds it
    │   └── LeaseConflict      another host's use of the volume forbids this host's
    ├── CorruptLease           a volume's claim record cannot be read; an operator must clear it
    ├── QuotaExceeded          the tenant's volume count or total size would be exceeded
    │                          (or Cinder refused with 413: its message is kept)
    ├── PermissionDenied       our policy, Ceph's caps or OpenStack (401/403) refuse it
    ├── VolumeBusy             in use (mounted, mapped, watched) where that forbids the operation
    ├── DeadlineExceeded       an operation did not finish within its time budget
    ├── StateUnwritable        the daemon cannot record its state on local disk (full, read-only)
    ├── CephError              any other failure talking to Ceph
    │   └── CephUnavailable    the cluster cannot be reached right now
    ├── OpenStackError         any other failure talking to Keystone, Cinder or Nova
    │   ├── OpenStackUnavailable  a service cannot be reached right now (refused,
    │   │                         timed out, 502/503/504); the message names it
    │   └── VolumeFailed       a Cinder volume ended in an error state (Cinder's reason)
    └── ProcessError           an external command failed (output kept for the log)
"""

from __future__ import annotations


class RbdPluginError(Exception):
    """Root of every error rbdplugin raises on purpose."""

    # A short machine-readable reason, used for logs and metric labels (bounded set).
    reason = "error"


class ConfigError(RbdPluginError):
    reason = "config"


class InvalidRequest(RbdPluginError):
    reason = "invalid_request"


class InvalidArgument(InvalidRequest):
    reason = "invalid_argument"


class NotFound(RbdPluginError):
    reason = "not_found"


class Conflict(RbdPluginError):
    reason = "conflict"


class LeaseConflict(Conflict):
    reason = "lock_conflict"


class CorruptLease(RbdPluginError):
    """The lease object cannot be read as a lease: only an operator can clear it."""

    reason = "corrupt_lease"


class QuotaExceeded(RbdPluginError):
    reason = "quota"


class PermissionDenied(RbdPluginError):
    reason = "permission"


class VolumeBusy(RbdPluginError):
    reason = "busy"


class DeadlineExceeded(RbdPluginError):
    reason = "deadline"


class StateUnwritable(RbdPluginError):
    reason = "state"


class CephError(RbdPluginError):
    reason = "ceph"


class CephUnavailable(CephError):
    reason = "ceph_unavailable"


class OpenStackError(RbdPluginError):
    reason = "openstack"


class OpenStackUnavailable(OpenStackError):
    reason = "openstack_unavailable"


class VolumeFailed(OpenStackError):
    """A Cinder volume went to ``status`` (``error``, ...); the message carries Cinder's reason."""

    reason = "volume_failed"

    def __init__(self, message: str, *, volume_id: str, status: str) -> None:
        super().__init__(message)
        self.volume_id = volume_id
        self.status = status


class ProcessError(RbdPluginError):
    """An external command failed; ``output`` holds its (redacted) stderr/stdout."""

    reason = "process"

    def __init__(self, message: str, *, returncode: int | None = None, output: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.output = output
