"""bench.phantom_data: the demo's layout, reused when it matches, one seeded split."""

from __future__ import annotations

from splitunet.evaluation.bench.phantom_data import SECRET_FILE, prepare_bench_data


def test_data_is_made_once_in_the_demo_layout_and_split(tmp_path):
    data = prepare_bench_data(tmp_path, cases=4, shape=(20, 20, 20), seed=1, num_val_cases=1, progress=False)
    assert (tmp_path / "phantom_msd" / "dataset.json").is_file()
    assert sorted(p.name for p in data.parties.iterdir()) == ["flair", "labels", "t1", "t1gd", "t2"]
    assert (tmp_path / SECRET_FILE).read_text().strip() == data.secret
    assert len(data.val_keys) == 1 and len(data.train_keys) == 3
    assert not set(data.val_keys) & set(data.train_keys)
    assert all(shape == (20, 20, 20) for shape in data.shapes.values())

    stamp = (tmp_path / "phantom_msd" / "dataset.json").stat().st_mtime_ns
    again = prepare_bench_data(tmp_path, cases=4, shape=(20, 20, 20), seed=1, num_val_cases=1, progress=False)
    assert (tmp_path / "phantom_msd" / "dataset.json").stat().st_mtime_ns == stamp
    assert again.val_keys == data.val_keys and again.secret == data.secret

    other = prepare_bench_data(tmp_path, cases=3, shape=(20, 20, 20), seed=1, num_val_cases=1, progress=False)
    assert len(other.train_keys) + len(other.val_keys) == 3
