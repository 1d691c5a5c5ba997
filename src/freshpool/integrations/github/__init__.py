"""GitHub Actions on freshpool nodes: just-in-time runners, one job per node.

`config` is the settings file; `auth` a token or an App's installation token; `api`
the REST calls; `webhook` the signed `workflow_job` deliveries; `fleet` what is known
of jobs and runners, and the demand; `runners` one runner's life on a node;
`reconcile` the loop over all of it; `serve` the process that runs them.
"""
