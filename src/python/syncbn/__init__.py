"""syncbn: clients of the syncbnd service, which runs synchronized
normalization across the ranks of an MPI job.

    import syncbn
    c = syncbn.Client()      # the worker named by $SYNCBN_SOCKET
    c.hello()

`syncbn.torch` (needs torch) holds SyncBatchNorm for CPU tensors and
convert_sync_batchnorm; launch the trainers with
`mpirun -np P syncbnd -- python3 train.py`.
"""
from syncbn._connect import ConnectError
from syncbn.client import SyncbnClient, SyncbnError

__version__ = "0.1.0"

Client = SyncbnClient

__all__ = ["Client", "ConnectError", "SyncbnClient", "SyncbnError",
           "__version__"]
