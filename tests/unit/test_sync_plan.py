"""`deepfleet sync`'s pure parts: what each host needs, the fan-out shape, the plan frames."""

from __future__ import annotations

import os

import pytest

from deepfleet.errors import DeepfleetError
from deepfleet.fleet.inventory import Fleet, Host
from deepfleet.fleet.remote_sync import subtree_wants
from deepfleet.fleet.sync import SyncOptions, run_sync, source_items
from deepfleet.fleet.sync_plan import (HEAD, HostItemPlan, SyncItem, describe_tree, fanout_shape, fanout_tree,
                                       host_item_plan, node_plan, space_problem)

A, B = "a" * 64, "b" * 64
ITEM = SyncItem(source="/src/ds", dest="/data/ds", kind="dir",
                files={"x/one.bin": {"sha256": A, "size": 100, "mtime_ns": 1, "mode": 0o644},
                       "two.bin": {"sha256": B, "size": 50, "mtime_ns": 1, "mode": 0o644}},
                links={"latest": "x"})


def found(**fields):
    return {"exists": True, "files": {}, "links": {}, "partials": {}, "free": 10**9, "writable": True,
            "nearest": "/data", "device": 1, **fields}


def test_a_host_without_the_data_wants_everything():
    plan = host_item_plan(ITEM, found(exists=False), delete=False)
    assert plan.want == {"x/one.bin": 0, "two.bin": 0} and plan.links == ("latest",) and plan.send_bytes == 150


def test_a_host_with_everything_wants_nothing_and_extras_are_counted_or_deleted():
    held = found(files={"x/one.bin": A, "two.bin": B, "old.bin": A}, links={"latest": "x"})
    kept = host_item_plan(ITEM, held, delete=False)
    assert (kept.want, kept.links, kept.extra, kept.delete) == ({}, (), 1, ())
    deleted = host_item_plan(ITEM, held, delete=True)
    assert (deleted.extra, deleted.delete) == (0, ("old.bin",))


def test_only_changed_files_are_sent_and_a_partial_resumes_from_its_byte():
    plan = host_item_plan(ITEM, found(files={"x/one.bin": B, "two.bin": B}, links={"latest": "y"},
                                      partials={A: 60}), delete=False)
    assert plan.want == {"x/one.bin": 60} and plan.links == ("latest",) and plan.send_bytes == 40


def test_a_partial_longer_than_the_file_is_not_trusted():
    assert host_item_plan(ITEM, found(partials={A: 101}), delete=False).want["x/one.bin"] == 0


def test_a_symlinked_dir_on_the_host_is_refused_before_any_write():
    plan = host_item_plan(ITEM, found(links={"x": "/etc"}), delete=False)
    assert plan.problem == "is a symlink to /etc there, a directory in the source: writing through it would leave /data/ds"
    assert plan.path == "/data/ds/x"


def test_the_destination_itself_being_a_symlink_is_refused():
    plan = host_item_plan(ITEM, {"exists": True, "dest_link": "/mnt/other"}, delete=False)
    assert plan.problem.startswith("is a symlink to /mnt/other") and plan.path == "/data/ds"


def test_a_dir_where_the_source_has_a_file_is_refused():
    plan = host_item_plan(ITEM, found(files={"two.bin/inner": A}), delete=False)
    assert plan.problem == "is a directory there, a file in the source" and plan.path == "/data/ds/two.bin"


def test_read_only_is_refused_only_when_something_must_be_written():
    assert host_item_plan(ITEM, found(exists=False, writable=False), delete=False).problem.startswith("is not writable")
    held = found(files={"x/one.bin": A, "two.bin": B}, links={"latest": "x"}, writable=False)
    assert host_item_plan(ITEM, held, delete=False).problem is None


def test_space_is_summed_over_items_on_one_filesystem():
    plans = [HostItemPlan(send_bytes=60 * 2**20), HostItemPlan(send_bytes=60 * 2**20)]
    same = [found(free=100 * 2**20, nearest="/data")] * 2
    assert space_problem(plans, same) == ("/data", "no space: needs 120.0 MiB, 100.0 MiB free")
    apart = [found(free=100 * 2**20, device=1), found(free=100 * 2**20, device=2)]
    assert space_problem(plans, apart) is None


@pytest.mark.parametrize("count,shape", [(1, "direct"), (2, "direct"), (3, "chain"), (8, "chain"), (9, "tree"),
                                         (64, "tree")])
def test_the_shape_follows_the_host_count(count, shape):
    assert fanout_shape(count) == shape
    names = [f"h{i}" for i in range(count)]
    tree = fanout_tree(names, shape)
    children = [child for kids in tree.values() for child in kids]
    assert sorted(children) == sorted(names)                  # every host fed exactly once
    assert len(tree[HEAD]) <= 2 or shape == "direct"          # the head's uplink carries the data at most twice
    assert max(len(kids) for kids in tree.values()) <= (2 if shape != "direct" else count)


def test_a_requested_shape_wins():
    assert fanout_shape(20, "chain") == "chain" and fanout_shape(2, "tree") == "tree"


def test_describe_names_who_forwards_to_whom():
    names = ["h1", "h2", "h3", "h4", "h5"]
    assert describe_tree(fanout_tree(names, "chain"), "chain") == "chain: head -> h1 -> h2 -> h3 -> h4 -> h5"
    assert describe_tree(fanout_tree(names, "tree"), "tree") == "tree: head -> h1, h2; h1 -> h3, h4; h2 -> h5"
    assert describe_tree(fanout_tree(names[:2], "direct"), "direct") == "direct: head -> h1, h2"


def test_plan_frames_nest_and_forward_the_smallest_offset_below():
    tree = fanout_tree(["h1", "h2", "h3"], "chain")
    plans = {"h1": [HostItemPlan(want={"a": 10})], "h2": [HostItemPlan(want={"a": 0, "b": 5}, links=("l",))],
             "h3": [HostItemPlan(delete=("old",))]}
    frame = node_plan("h1", tree, plans, lambda parent, child: [parent, child], 30)
    assert frame["children"][0]["argv"] == ["h1", "h2"] and frame["children"][0]["plan"]["children"][0]["host"] == "h3"
    assert frame["children"][0]["plan"]["children"][0]["plan"]["delete"] == {"0": ["old"]}
    files, links = subtree_wants(frame)
    assert files == {"0": {"a": 0, "b": 5}} and links == {"0": {"l"}}


def test_source_problems_are_one_line_each(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "out").symlink_to("/etc/hostname")
    with pytest.raises(DeepfleetError) as caught:
        source_items([str(tmp_path / "nope"), str(tmp_path / "ds"), "/"], None, "refuse")
    lines = caught.value.render().splitlines()
    assert lines == [f"error: head:{tmp_path}/nope: no such file or directory (fix: check the path)",
                     f"error: head:{tmp_path}/ds/out: symlink to /etc/hostname points outside {tmp_path}/ds "
                     f"(fix: --outside-links keep copies it as a link; or replace it with the file)",
                     "error: head:/: refusing to sync the root directory (fix: name the dirs or files to sync)"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "ds").mkdir()
    with pytest.raises(DeepfleetError, match="as .* does"):
        source_items([str(tmp_path / "other" / "ds"), str(tmp_path / "other" / "ds" / ".." / ".." / "ds")], "/x", "keep")


def test_a_local_sync_writes_verifies_and_resyncs_nothing(tmp_path):
    """The head as its own host, with --to: the same stream code, no ssh."""
    source = tmp_path / "src"
    (source / "a" / "b").mkdir(parents=True)
    (source / "a" / "b" / "f.bin").write_bytes(os.urandom(3 * 2**20 + 7))
    (source / "a" / "empty").write_bytes(b"")
    os.chmod(source / "a" / "empty", 0o600)
    (source / "link").symlink_to("a/b")
    fleet = Fleet(hosts=(Host(name="here", address="127.0.0.1", local=True),), source="test")
    first = run_sync(fleet, [str(source)], SyncOptions(to=str(tmp_path / "dest")))
    assert [(o.host, o.verdict, o.bytes) for o in first.outcomes] == [("here", "verified", 3 * 2**20 + 7)]
    copy = tmp_path / "dest" / "src"
    assert (copy / "a" / "b" / "f.bin").read_bytes() == (source / "a" / "b" / "f.bin").read_bytes()
    assert os.readlink(copy / "link") == "a/b" and (copy / "a" / "empty").stat().st_mode & 0o777 == 0o600
    assert (copy / "a" / "b" / "f.bin").stat().st_mtime_ns == (source / "a" / "b" / "f.bin").stat().st_mtime_ns
    second = run_sync(fleet, [str(source)], SyncOptions(to=str(tmp_path / "dest")))
    assert [o.verdict for o in second.outcomes] == ["unchanged"] and second.shape == "nothing to send"
    same_place = run_sync(fleet, [str(source)])
    assert [o.verdict for o in same_place.outcomes] == ["source"]
