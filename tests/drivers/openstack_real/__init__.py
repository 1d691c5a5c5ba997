"""The openstack driver against a real single-host OpenStack (setup.sh), opt-in."""
