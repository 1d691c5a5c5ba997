"""nodepool-compat: `serve` speaks Nodepool's ZooKeeper protocol, so Zuul uses the pool
unchanged (wire.py: the znodes; desk.py: requests; view.py: nodes; bridge.py: the
thread that runs them). Needs kazoo: pip install 'freshpool[nodepool]'."""
