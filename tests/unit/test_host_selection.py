"""--include / --exclude as DeepSpeed's launcher reads them: hosts first, GPU indices once counts are known."""

import pytest

from deepfleet.errors import DeepfleetError
from deepfleet.fleet.host_hardware import HostHardware, with_slots
from deepfleet.fleet.host_selection import HostSelection, parse_gpu_choice, select_hosts
from deepfleet.fleet.inventory import Fleet, Host

FLEET = Fleet(hosts=(Host(name="gpu1", address="10.0.0.1"), Host(name="gpu2", address="10.0.0.2"),
                     Host(name="gpu3", address="10.0.0.3", slots=4)), source="fleet.yaml")
EIGHT_GPUS = [HostHardware(name=h.name, gpu_count=8) for h in FLEET.hosts]


def placed(include=None, exclude=None, hardware=EIGHT_GPUS):
    chosen = select_hosts(FLEET, HostSelection.parse(include, exclude))
    by_name = {h.name: h for h in hardware}
    return {h.name: (h.slots, dict(h.env).get("CUDA_VISIBLE_DEVICES"))
            for h in with_slots(chosen, [by_name[h.name] for h in chosen.hosts]).hosts}


def test_deepspeed_syntax():
    assert parse_gpu_choice("gpu1:0,1@gpu2", "--include") == {"gpu1": (0, 1), "gpu2": None}
    assert parse_gpu_choice(" gpu1 : 3, 1 ", "--exclude") == {"gpu1": (1, 3)}


def test_include_keeps_fleet_order_and_pins_gpus():
    assert placed(include="gpu2@gpu1:0,1") == {"gpu1": (2, "0,1"), "gpu2": (8, None)}
    assert placed(include="10.0.0.3") == {"gpu3": (4, None)}   # by address; configured slots stay


def test_exclude_drops_hosts_or_gpus():
    assert placed(exclude="gpu3") == {"gpu1": (8, None), "gpu2": (8, None)}
    assert placed(exclude="gpu1:7") == {"gpu1": (7, "0,1,2,3,4,5,6"), "gpu2": (8, None), "gpu3": (4, None)}


@pytest.mark.parametrize("include, exclude, message", [
    ("gpu-1", None, 'no host \'gpu-1\' in fleet.yaml (did you mean "gpu1"?)'),
    ("gpu1:a", None, "cannot read 'gpu1:a'"),
    ("gpu1@gpu1", None, "cannot read 'gpu1'"),
    ("gpu1", "gpu2", "both --include and --exclude"),
    (None, "gpu1@gpu2@gpu3", "--exclude leaves no host"),
    ("gpu1:8", None, "GPU 8 chosen on host gpu1, which has 8 GPU(s)"),
    (None, "gpu2:0,1,2,3,4,5,6,7", "no GPU left on host gpu2"),
])
def test_bad_selections_are_one_line_errors(include, exclude, message):
    with pytest.raises(DeepfleetError) as error:
        placed(include, exclude)
    assert len(error.value.problems) == 1 and message in error.value.render()

