"""Content manifests: what doctor compares across hosts and sync will skip by (stdlib, runs on hosts)."""

import os

from deepfleet.fleet.remote_probe_manifest import (MANIFEST_NAME, content_digest, load_manifest, manifest_path,
                                                   path_summary, scan)


def tree(root):
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"a": 1}')
    (root / "sub" / "weights.bin").write_bytes(os.urandom(3000))
    os.symlink("config.json", root / "latest")
    os.symlink("/etc/hostname", root / "outside")
    return root


def test_a_tree_summarises_files_and_links_and_keeps_its_manifest(tmp_path):
    root = tree(tmp_path / "model")
    summary = path_summary(str(root))
    assert summary["kind"] == "dir" and sorted(summary["files"]) == ["config.json", "sub/weights.bin"]
    assert summary["links"] == {"latest": "config.json", "outside": "/etc/hostname"}
    assert summary["bytes"] == 3008 and (root / MANIFEST_NAME).is_file()
    manifest = load_manifest(str(root))
    assert manifest["links"]["outside"]["inside"] is False and manifest["links"]["latest"]["inside"] is True
    assert path_summary(str(root)) == summary   # the manifest itself is never content


def test_unchanged_files_are_not_hashed_again_and_changes_are_seen(tmp_path, monkeypatch):
    root = tree(tmp_path / "model")
    first = path_summary(str(root))
    import deepfleet.fleet.remote_probe_manifest as manifests
    hashed = []
    real = manifests.file_sha256
    monkeypatch.setattr(manifests, "file_sha256", lambda path, limit=None: hashed.append(path) or real(path, limit))
    assert path_summary(str(root)) == first and hashed == []
    (root / "config.json").write_text('{"a": 2}')
    second = path_summary(str(root))
    assert hashed == [str(root / "config.json")] and second["digest"] != first["digest"]


def test_same_content_same_digest_wherever_it_lives(tmp_path):
    one, two = tree(tmp_path / "one"), tmp_path / "two"
    two.mkdir()
    (two / "sub").mkdir()
    (two / "config.json").write_text('{"a": 1}')
    (two / "sub" / "weights.bin").write_bytes((one / "sub" / "weights.bin").read_bytes())
    os.symlink("config.json", two / "latest")
    os.symlink("/etc/hostname", two / "outside")
    assert content_digest(scan(str(one))) == content_digest(scan(str(two)))


def test_a_single_file_keeps_its_manifest_beside_it(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    summary = path_summary(str(data))
    assert summary["files"] == {"train.jsonl": scan(str(data))["files"]["train.jsonl"]["sha256"]}
    assert manifest_path(str(data)) == str(tmp_path / ".train.jsonl.deepfleet-manifest.json")
    assert path_summary(str(tmp_path / "nope")) == {"exists": False}
    # A dir holding that file does not count the file's manifest as content.
    assert sorted(path_summary(str(tmp_path))["files"]) == ["train.jsonl"]


def test_read_only_data_is_summarised_without_a_manifest(tmp_path):
    root = tree(tmp_path / "model")
    os.chmod(root, 0o555)
    try:
        summary = path_summary(str(root))
    finally:
        os.chmod(root, 0o755)
    assert sorted(summary["files"]) == ["config.json", "sub/weights.bin"]
