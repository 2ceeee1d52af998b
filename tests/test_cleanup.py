"""Stopped trials give their GPUs back even without Ray's dashboard (real local Ray, no mocks)."""

import pytest


@pytest.fixture(scope="module")
def ray_without_dashboard():
    import ray

    ray.init(num_cpus=4, include_dashboard=False)
    yield ray
    ray.shutdown()


def test_reaper_removes_only_the_groups_of_dead_actors(ray_without_dashboard):
    ray = ray_without_dashboard
    from ray.util.placement_group import placement_group, placement_group_table

    from tuner.tune.cleanup import reap

    @ray.remote(num_cpus=0)
    class Controller:  # stands for a trial's TorchTrainer controller
        def reserve(self):
            pg = placement_group([{"CPU": 1}])
            ray.get(pg.ready())
            return pg.id.hex()

    dead, alive = Controller.remote(), Controller.remote()
    dead_pg, alive_pg = ray.get(dead.reserve.remote()), ray.get(alive.reserve.remote())
    driver_pg = placement_group([{"CPU": 1}])
    ray.get(driver_pg.ready())
    ray.kill(dead)
    import time

    time.sleep(1)
    assert ray.available_resources().get("CPU", 0) == 1  # the dead actor's CPU is still reserved
    assert reap() == 1
    state = {pg_id: info["state"] for pg_id, info in placement_group_table().items()}
    assert state[dead_pg] == "REMOVED" and state[alive_pg] == "CREATED" and state[driver_pg.id.hex()] == "CREATED"
    deadline = time.time() + 10
    while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2  # given back
    assert reap() == 0
