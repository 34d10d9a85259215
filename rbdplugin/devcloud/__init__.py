"""The devcloud: a throwaway OpenStack on 127.0.0.1 for Cinder-attach mode.

``rbdplugin devcloud start --dir DIR`` (or ``python -m rbdplugin.devcloud``) starts
the dev Ceph cluster, a real Keystone, a real Cinder (API, scheduler and volume in
one process, the real RBD driver on that cluster) and a Nova stand-in, then writes
``DIR/clouds.yaml`` and ``DIR/rbdplugin.toml``. A development tool: the daemon's
serve path never imports this package.

    cli.py               the command line (argparse only at import time)
    cloud.py             DevCloud: start, stop, status; configs; process handling
    venv.py              the isolated OpenStack venv, cached by a hash of its pins
    nova.py              the Nova stand-in's HTTP face (aiohttp), run as a process
    compute.py           its logic: token checks, Nova's attach/detach order, BDMs
    disks.py             disk makers: how an attached volume appears in a server
    qmp.py               a small QMP client (the ``qmp`` disk maker, the kernel tier)
    bridge.py            run in the kernel tier's guest: its 127.0.0.1:PORT relayed
                         to the host's loopback services (standard library only)
    keystone_service.py  } run by the OpenStack venv's python as separate
    cinder_service.py    } processes; they import OpenStack, never rbdplugin
    populate.py          }
"""
