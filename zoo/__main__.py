import torch.distributed as dist

from zoo.cli import main

main()
if dist.is_available() and dist.is_initialized():
    # Lightning destroys only NCCL groups at exit; a gloo group left to interpreter shutdown can abort it
    dist.destroy_process_group()
