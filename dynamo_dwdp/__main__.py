"""`python -m dynamo_dwdp`: the Dynamo worker (one rank of one pool). See dynamo_dwdp/worker/."""
from dynamo_dwdp.worker.main import main

if __name__ == "__main__":
    main()
