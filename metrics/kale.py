"""KALE of a Generalized EBM as an evaluation metric: `--eval_metric kale` and `--eval_kale` of ebm_train.py,
`--only_test` on a GEBM run, and the KALE column of ebm_chain.py.

    KALE = mean_data -(D(x) + A) - mean_fakes exp(-(D(x') + A)) + 1        (GEBM `trainer.compute_kale`)
with D the energy, A the learned log-partition, x over the whole training split (and the test split, reported as
`kale_test`, with the same fake term, as GEBM does) and x' the samples of seeds 0..N-1 drawn by `sample_fn`
(default: the base generator, so this is KALE(P || G) as the energy sees it; ebm_chain.py passes chain samples).
Both means run over every process's share and are summed in float64, so the value does not depend on the number
of processes.

KALE ranks nothing on its own: KL(P || GEBM) = KL(P || G) - KALE_DV (the Donsker-Varadhan form, >= the learned-A
form), so a higher KALE means an energy that corrects more, a lower one a base closer to the data, and in joint
training both move, so utils/run.py keeps no best checkpoint by it (NOT_RANKED).
"""

import time

import torch

from metrics.evaluate import dataset_batches
from utils.grid import check_finite


class KALEEvaluator:
    def __init__(self, accelerator, n_samples: int, dataset, test_dataset=None, batch_size: int = 250, fixed=False):
        self.accelerator, self.n_samples, self.batch_size = accelerator, n_samples, batch_size
        self.dataset, self.test_dataset = dataset, test_dataset
        self.cache = {} if fixed else None  # `fixed`: the energy never changes (ebm_chain.py), data terms once

    def _reduce(self, total: float, count: int) -> float:
        acc = self.accelerator
        packed = torch.tensor([total, float(count)], dtype=torch.float64, device=acc.device)
        packed = acc.reduce(packed, reduction="sum") if acc.num_processes > 1 else packed
        return (packed[0] / packed[1]).item()

    def data_term(self, model, dataset) -> float:
        """mean over the dataset of -(D(x) + A)."""
        if self.cache is not None and id(dataset) in self.cache:
            return self.cache[id(dataset)]
        acc, total, count = self.accelerator, 0.0, 0
        for _, reals, _ in dataset_batches(dataset, acc.process_index, acc.num_processes, self.batch_size, False):
            total -= (model.energy(reals.to(acc.device)).double() + model.log_partition.double()).sum().item()
            count += len(reals)
        value = self._reduce(total, count)
        if self.cache is not None:
            self.cache[id(dataset)] = value
        return value

    @torch.no_grad()
    def __call__(self, sample_fn, model, n_classes: int = 0) -> dict:
        acc, start, was_training = self.accelerator, time.perf_counter(), model.training
        model.eval()
        mine = list(range(acc.process_index, self.n_samples, acc.num_processes))
        total = 0.0
        for first in range(0, len(mine), self.batch_size):
            samples, _ = sample_fn(model, mine[first : first + self.batch_size], None, acc.device)
            check_finite(samples, "the evaluated model's samples")
            d = model.energy(samples).double() + model.log_partition.double()
            total += torch.exp(-d).sum().item()
        fake_term = self._reduce(total, len(mine))
        result = {"metric": "kale", "value": self.data_term(model, self.dataset) - fake_term + 1}
        if self.test_dataset is not None:
            result["kale_test"] = self.data_term(model, self.test_dataset) - fake_term + 1
        result |= {"n_samples": self.n_samples, "log_partition": model.log_partition.item(), "fake_term": fake_term}
        model.train(was_training)
        result["seconds"] = round(time.perf_counter() - start, 3)
        return result
