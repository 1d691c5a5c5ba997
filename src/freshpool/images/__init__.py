"""Image builds: a debootstrap base with layers stacked on it, each made in a build node.

Where to start: pipeline builds one image (plan says which layers and their cache
keys, steps makes each in a buildnode, layers keeps them, manifest describes the
result); debootstrap builds the base (with rootcommand, dpkg and mirror). Both use
errors, failures, retry, buildlog and remove.
"""
