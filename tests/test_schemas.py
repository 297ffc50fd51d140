import json
from pathlib import Path

import pytest
from datasets import Dataset, load_dataset
from PIL import Image

from schemas.easyedit import EASYEDIT_FIELDS, export_easyedit
from schemas.features import OKEDIT_FEATURES, from_hf_row, stats_frame, to_hf_row
from schemas.record import FieldProvenance, OkeditRecord, ProbeResult, Validation
from tests.records import make_record


def test_features_cover_every_record_field():
    assert set(OKEDIT_FEATURES) == set(OkeditRecord.model_fields)


def test_pydantic_to_parquet_and_back(tmp_path: Path):
    validation = Validation(
        verdict="ok",
        epsilon=0.3,
        probes=[
            ProbeResult(
                kind="edit",
                index=0,
                distance=0.0,
                routed=True,
                expected="lyon",
                pre_accuracy=0.0,
                post_accuracy=1.0,
            )
        ],
    )
    records = [make_record("a"), make_record("b", validation=validation)]
    dataset = Dataset.from_list([to_hf_row(r) for r in records], features=OKEDIT_FEATURES)
    path = tmp_path / "copy" / "train.parquet"
    dataset.to_parquet(str(path))
    loaded = load_dataset("parquet", data_files=str(path), split="train")
    assert loaded.features == OKEDIT_FEATURES
    assert isinstance(loaded[0]["image"], Image.Image)
    back = [from_hf_row(row) for row in loaded.cast_column("image", OKEDIT_FEATURES["image"])]
    assert back[1].validation == validation
    assert back[0].model_dump(
        exclude={"image", "image_rephrases", "locality_images", "locality_image_train"}
    ) == records[0].model_dump(
        exclude={"image", "image_rephrases", "locality_images", "locality_image_train"}
    )
    assert len(back[0].image_rephrases) == 10


def test_parquet_embeds_image_bytes_not_paths(tmp_path: Path):
    dataset = Dataset.from_list([to_hf_row(make_record())], features=OKEDIT_FEATURES)
    path = tmp_path / "x.parquet"
    dataset.to_parquet(str(path))
    import pyarrow.parquet as pq

    cell = pq.read_table(path).to_pylist()[0]["image"]
    assert cell["bytes"] and cell["path"] is None


def test_easyedit_export_has_11_nonempty_fields_and_resolvable_images(tmp_path: Path):
    path = export_easyedit([make_record("a"), make_record("b")], tmp_path / "easyedit")
    entries = json.loads(path.read_text())
    assert len(entries) == 2
    for entry in entries:
        assert tuple(entry) == ("item_id", *EASYEDIT_FIELDS)
        assert all(isinstance(v, str) and v.strip() for v in entry.values())
        for key in ("image", "image_rephrase", "m_loc"):
            assert not Path(entry[key]).is_absolute()
            Image.open(path.parent / entry[key]).verify()
    # EasyEdit's `loc`: the image-free question, as written (no "nq question: " prefix)
    assert (entries[0]["loc"], entries[0]["loc_ans"]) == (
        "what is the capital of russia?",
        "moscow",
    )


def test_easyedit_export_refuses_a_record_without_image_free_locality(tmp_path: Path):
    records = [make_record("a"), make_record("no-loc", image_free_locality=None)]
    with pytest.raises(ValueError, match="no-loc") as error:
        export_easyedit(records, tmp_path / "easyedit")
    assert "image_free_locality" in str(error.value) and "a," not in str(error.value)


def test_easyedit_loc_has_the_nq_prefix_only_for_pairs_from_nq(tmp_path: Path):
    def sourced(item_id: str, params: dict) -> OkeditRecord:
        prov = FieldProvenance(
            field="image_free_locality",
            backend="text-locality-file",
            seed=0,
            params=json.dumps(params),
        )
        return make_record(item_id, provenance=[*make_record().provenance, prov])

    records = [
        sourced("nq", {"line": 1, "file_sha256": "x", "source": "nq"}),
        sourced("file", {"line": 2, "file_sha256": "x"}),
        sourced("other", {"line": 3, "file_sha256": "x", "source": "triviaqa"}),
        make_record("llm"),  # no provenance for the field at all
        # "source": "nq" on another field's provenance does not count
        make_record(
            "elsewhere",
            provenance=[FieldProvenance(field="target", backend="t", params='{"source": "nq"}')],
        ),
    ]
    path = export_easyedit(records, tmp_path / "easyedit")
    loc = {e["item_id"]: e["loc"] for e in json.loads(path.read_text())}
    question = "what is the capital of russia?"
    assert loc == {
        "nq": "nq question: " + question,
        "file": question,
        "other": question,
        "llm": question,
        "elsewhere": question,
    }


def test_stats_frame_counts():
    frame = stats_frame([make_record("a"), make_record("b")])
    assert frame["n_rephrases"].to_list() == [10, 10]
    assert frame["verdict"].to_list() == ["not_run", "not_run"]
