import torch.distributed as dist

from zoo.cli import main

try:
    main()
finally:  # also when main() stops on an error: the ones a user fixes leave through SystemExit(2)
    if dist.is_available() and dist.is_initialized():
        # Lightning destroys only NCCL groups at exit; a gloo group left to interpreter shutdown can abort it
        dist.destroy_process_group()
