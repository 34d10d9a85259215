"""OpenStack for Cinder-attach mode: the Keystone/Cinder/Nova client and the server's own id.

- :mod:`rbdplugin.openstack.client`: a thin, typed client over openstacksdk (the optional
  ``cinder`` extra). Synchronous: callers run it off the event loop (``asyncio.to_thread``).
- :mod:`rbdplugin.openstack.server_id`: which server this VM is (config, config drive,
  metadata service, DMI), with no dependency on openstacksdk.

Nothing is imported here, so the daemon's other modes never load openstacksdk.
"""
