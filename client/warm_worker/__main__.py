"""``python -m client.warm_worker``: the node's warm worker process."""

from client.warm_worker.worker import main

main()
