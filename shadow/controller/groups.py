"""A group of rank actors on one Ray placement group, called together.

The main job is one group of `resources.num_ranks` ranks; each replay slot is a group of
`verify.replay_resources.num_ranks` ranks. The placement group reserves every rank's resources at
once (all or nothing), so a group never half-starts; a group that cannot get its resources simply
waits, and the controller reports it instead of blocking on it.
"""

from __future__ import annotations

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy



class RankGroup:
    def __init__(self, actor_cls, args: tuple, *, num_ranks: int, num_micro_batches: int, num_cpus: float,
                 num_gpus: float, name: str):
        self.name = name
        self.num_ranks = num_ranks
        bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
        self.placement = placement_group([bundle] * num_ranks, strategy="PACK", name=name)
        remote_cls = ray.remote(actor_cls)
        self.actors = [
            remote_cls.options(
                num_cpus=num_cpus, num_gpus=num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=i),
            ).remote(*args)
            for i in range(num_ranks)
        ]
        self._num_micro_batches = num_micro_batches
        self._ready_ref = None

    def setup(self) -> list:
        """Build every rank around rank 0's rendezvous address. Nothing blocks here: the address travels
        as an object ref that Ray resolves when rank 0 is up (a group still waiting for resources must
        not stall the controller). Returns the refs to wait on."""
        address = self.actors[0].address.remote() if self.num_ranks > 1 else ""
        return [actor.setup.remote(self._num_micro_batches, self.num_ranks, rank, address)
                for rank, actor in enumerate(self.actors)]

    def has_resources(self) -> bool:
        if self._ready_ref is None:
            self._ready_ref = self.placement.ready()
        ready, _ = ray.wait([self._ready_ref], timeout=0)
        return bool(ready)

    def call(self, method: str, *args) -> list:
        """Call `method` on every rank; rank 0's result is the group's answer."""
        return [getattr(actor, method).remote(*args) for actor in self.actors]


    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.placement)
