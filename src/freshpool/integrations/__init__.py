"""CI servers running their jobs on freshpool nodes.

This layer sits above the API client: like a CI job, it is a consumer of nodes.
`agent` is the life of one CI agent on a node, shared by every CI system;
`ciserver` is how all of them talk to a CI server (one backoff, one notion of a
transient failure); each CI system has a module or package of its own.
"""
