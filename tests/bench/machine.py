"""What a benchmark's numbers were measured on, for the head of each script's JSON: a number
without its machine and torch version cannot be compared with a later run's."""

import platform

import torch


def machine() -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads()}  # fmt: skip
