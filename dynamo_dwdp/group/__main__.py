"""`python -m dynamo_dwdp.group --ranks N -- <worker command>`: the rank supervisor."""
import sys

from dynamo_dwdp.group.supervisor import main

sys.exit(main())
