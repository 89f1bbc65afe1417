"""Figure 2 statistics on hand-made '+' datasets: counts, lengths, changed share, new facts."""
from __future__ import annotations

import pandas as pd
import pytest

from dimkit import datasets, stats
from dimkit.errors import DataError, DimkitError


def make_plus(name: str, meta: dict | None = None) -> datasets.Dataset:
    """Four entities covering: new number + name, unchanged, no original, paraphrase only."""
    ents = pd.DataFrame({
        "qid": ["Q1", "Q2", "Q3", "Q4"],
        "name": ["Pellmarsh", "Amberlyn Koss", "Quenmoor", "Jorvande"],
        "description_original": ["Pellmarsh is a mountain.", "A novelist.", None, "Jorvande is a river in the north."],
        "description": [
            "Pellmarsh is a mountain of 4,700 metres in the Ashen Teeth.",  # new number, new names
            "A   novelist.",  # same text, other whitespace: unchanged
            "Quenmoor is a company founded in 1891.",  # no original: new number
            "Jorvande is a long river in the north.",  # paraphrase: a new content word only
        ],
        "description_source": ["llm:m:who-is@1"] * 3 + ["original (x); no LLM answer"],
        "images": [[], [], [], []],
    })
    ments = pd.DataFrame({
        "mention_id": [f"m{i}" for i in range(6)], "split": ["train", "train", "train", "dev", "test", "test"],
        "sentence": ["s"] * 6, "mention": ["Pellmarsh"] * 6, "image": [None] * 6,
        "qid": ["Q1", "Q2", "Q3", "Q4", "Q1", None],
    })
    datasets.write_prepared(datasets.dataset_dir(name), ments, ents, {"name": name, **(meta or {})})
    return datasets.load(name)


def test_new_facts_measure():
    f = stats.new_facts("Pellmarsh is a mountain of 4,700 metres in the Ashen Teeth. It was climbed in 1950.",
                        "Pellmarsh is a mountain. It is 1950 years old.", "Pellmarsh")
    assert f.numbers == ["4700"]  # "4,700" normalised; 1950 occurs in the original
    assert f.names == ["Ashen", "Teeth"]  # sentence-initial "It" and the entity's name do not count
    assert "metres" in f.content_words and "mountain" not in f.content_words
    assert "climbed" in f.content_words and "was" not in f.content_words  # function words never count
    assert f.any_fact
    # plural / possessive stems match the original; case is ignored
    g = stats.new_facts("The Mountains' peaks and rivers.", "a mountain peak near a river", None)
    assert g.content_words == [] and g.names == [] and not g.any_fact
    # nothing new, or nothing at all
    assert not stats.new_facts("Koss wrote books.", "Koss wrote books.", "Koss").any_fact
    assert stats.new_facts(None, "x").numbers == []
    assert stats.word_count("  two   words ") == 2 and stats.word_count(None) == 0


def test_enhanced_stats_on_a_hand_made_plus_dataset(kit_dirs):
    s = stats.enhanced_stats(make_plus("wikimel+"))
    assert not s.synthetic
    c = s.counts
    assert (c["entities"], c["mentions"], c["mentions_train"], c["mentions_dev"], c["mentions_test"]) == (4, 6, 3, 1, 2)
    assert c["entities_llm_description"] == 3 and c["entities_without_original"] == 1
    pe = s.per_entity.set_index("qid")
    assert pe["words_original"].tolist() == [4, 2, 0, 7]
    assert pe["words_description"].tolist() == [11, 2, 7, 8]
    assert pe["changed"].tolist() == [True, False, True, True]
    assert pe.loc["Q1", "new_numbers"] == ["4700"] and pe.loc["Q1", "new_names"] == ["Ashen", "Teeth"]
    assert pe.loc["Q3", "new_numbers"] == ["1891"]
    assert pe.loc["Q4", "new_content_words"] == ["long"] and not pe.loc["Q4", "has_new_fact"]
    summ = s.summary()
    assert summ["changed_share"] == pytest.approx(0.75)
    assert summ["new_number_share"] == pytest.approx(0.5)
    assert summ["new_name_share"] == pytest.approx(0.25)
    assert summ["new_fact_share"] == pytest.approx(0.5)
    assert summ["new_content_word_share"] == pytest.approx(0.75)
    # lengths: originals only where one exists
    assert summ["words_original_median"] == pytest.approx(4.0)
    assert summ["words_description_mean"] == pytest.approx(7.0)


def test_not_an_enhanced_dataset_names_the_field(kit_dirs):
    ds = make_plus("wikimel+")
    ds.entities = ds.entities.drop(columns=["description_original"])
    with pytest.raises(DataError, match="description_original") as err:
        stats.enhanced_stats(ds)
    assert "entities.parquet" in str(err.value)
    with pytest.raises(DimkitError, match="not an enhanced"):
        stats.figure2(["wikimel"], save=False)


def test_figure2_on_the_sample_says_synthetic_and_saves_png_pdf(kit_dirs):
    make_plus("sample+")
    make_plus("wikimel+")
    assert stats.enhanced_datasets_present() == ["wikimel+", "sample+"]
    res = stats.figure2(["sample+"])
    assert res.stats[0].synthetic
    assert "synthetic sample" in res.fig._suptitle.get_text()
    names = sorted(p.name for p in res.files)
    assert names == ["figure2_sample.pdf", "figure2_sample.png", "figure2_sample_stats.csv",
                     "figure2_sample_stats.md"]
    for p in res.files:
        assert p.is_file() and p.stat().st_size > 0
    assert res.files[0].parent == kit_dirs["figures"]
    assert (kit_dirs["figures"] / "tables" / "figure2_sample_stats.md").read_text().startswith("Synthetic sample")
    table = pd.read_csv(kit_dirs["figures"] / "tables" / "figure2_sample_stats.csv")
    assert table.loc[0, "new_fact_share"] == pytest.approx(0.5)
    import matplotlib.pyplot as plt
    plt.close(res.fig)


def test_figure2_of_paper_datasets_and_marked_synthetic_answers(kit_dirs):
    make_plus("wikimel+")
    make_plus("wikidiverse+", meta={"synthetic_answers": True})
    res = stats.figure2(save=False)  # every prepared '+' dataset, paper order
    assert [s.dataset for s in res.stats] == ["wikimel+", "wikidiverse+"]
    assert not res.files and stats.figure_name(res.stats) == "figure2"
    # synthetic answers on a real dataset name still make the title say so
    assert "synthetic" in res.fig._suptitle.get_text()
    only_real = stats.figure2(["wiki+"], save=False)
    assert "synthetic" not in only_real.fig._suptitle.get_text()
    assert "| Wiki+ | 4 | 6 |" in stats.stats_markdown(only_real.table)
    import matplotlib.pyplot as plt
    plt.close("all")


def test_figure2_name_stays_in_the_figures_folder(kit_dirs, tmp_path, capsys):
    """--name is a file stem, checked as a run name is: nothing is written outside the figures folder."""
    from dimkit import cli
    from dimkit.errors import ConfigError

    make_plus("sample+")
    for bad in ("../escaped", "../../etc/x", ".hidden", ""):
        with pytest.raises(ConfigError, match="name must be a plain file or folder name"):
            stats.figure2(["sample+"], name=bad)
        assert cli.main(["figure2", "--datasets", "sample+", "--name", bad]) == 2
        err = capsys.readouterr().err
        assert f"--name must be a plain file or folder name (no '/', not starting with '.'), got {bad!r}" in err
        assert "--folder" in err and "Traceback" not in err
    assert not list(tmp_path.glob("escaped*")) and not list(kit_dirs["figures"].rglob("*escaped*"))
    res = stats.figure2(["sample+"], name="figure2-mine")
    assert sorted(p.name for p in res.files)[0] == "figure2-mine.pdf"
    assert {p.parent for p in res.files} == {kit_dirs["figures"], kit_dirs["figures"] / "tables"}
    import matplotlib.pyplot as plt
    plt.close("all")


def test_no_enhanced_dataset_is_a_clear_error(kit_dirs):
    with pytest.raises(DimkitError, match="dimkit augment sample"):
        stats.figure2()


def test_the_measures_are_stored_and_a_rerun_reuses_them(kit_dirs, monkeypatch):
    from dimkit import augment, datasets, stats

    augment.augment("sample", model=augment.SAMPLE_ORACLE, replay=True, progress=False)
    first = stats.enhanced_stats("sample+")
    assert (datasets.dataset_dir("sample+") / "reports" / "figure2.parquet").is_file()
    monkeypatch.setattr(stats, "new_facts", lambda *a, **k: (_ for _ in ()).throw(AssertionError("measured again")))
    again = stats.enhanced_stats("sample+")
    assert again.summary() == first.summary()
    assert again.per_entity["new_names"].tolist() == first.per_entity["new_names"].tolist()
