"""``poptorch.DataLoader``: a torch DataLoader whose batches are whole host batches,
batch_size × deviceIterations × replicationFactor × gradientAccumulation samples, as PopTorch's."""
from typing import Any, Dict, Optional

import torch

from .enums import DataLoaderMode
from .options import Options


class DataLoader(torch.utils.data.DataLoader):
    def __init__(self, options: Options, dataset: torch.utils.data.Dataset, batch_size: int = 1,
                 shuffle: Optional[bool] = None, num_workers: int = 0, drop_last: bool = True,
                 persistent_workers: Optional[bool] = None, auto_distributed_partitioning: bool = True,
                 mode: DataLoaderMode = DataLoaderMode.Sync, async_options: Optional[Dict[str, Any]] = None,
                 rebatched_worker_size: Optional[int] = None, **kwargs):
        self.options = options if options is not None else Options()
        o = self.options
        self.combined_batch_size = (batch_size * o.device_iterations * o.replication_factor
                                    * o.Training.gradient_accumulation)
        self.mode = mode
        super().__init__(dataset, batch_size=self.combined_batch_size, shuffle=bool(shuffle),
                         num_workers=num_workers, drop_last=drop_last,
                         persistent_workers=bool(persistent_workers) and num_workers > 0, **kwargs)
