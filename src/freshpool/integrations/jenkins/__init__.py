"""Jenkins builds on freshpool nodes: one inbound agent per node, one build per agent.

`freshpool jenkins serve` reads the build queue, registers an agent for each node it
takes, takes the agent out of its label the moment its build starts (relabelled
`<label>-used`, as the seed did), and deletes it and destroys the node afterwards.
"""
