"""Training on your own files end to end: `jaxmt train --gin_file=runs/own_corpus.gin` on a
gzip'd TSV with bad lines in it trains, counts every skip in the model directory's report,
and the model translates into a language code the embedded corpus does not have."""

import gzip
import json

import pytest

from jaxmt import cli
from jaxmt.data import embedded

pytest.importorskip("seqio")

BAD_EVERY = 400  # one group of four bad lines after every BAD_EVERY good pairs


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("own_corpus")
    train, _ = embedded.parallel_pairs("en", "pt", "train")
    valid, _ = embedded.parallel_pairs("en", "pt", "validation")
    train, valid = train[:1200], valid[:50]
    bad = 0
    with gzip.open(d / "en-pt.train.tsv.gz", "wb") as f:
        for i, (en, pt) in enumerate(train):
            f.write(f"{en}\t{pt}\n".encode())
            if i % BAD_EVERY == 0:
                f.write(b"Caf\xe9 au lait\tCaf\xe9 com leite\n")  # Latin-1
                f.write(f"{en}\n".encode())  # no target column
                f.write(f"{en}\t\x07{pt}\n".encode())  # a control character
                f.write(f"{en}\t{pt}\n".encode())  # a duplicate
                bad += 1
    with open(d / "en-pt.valid.tsv", "w", encoding="utf-8") as f:
        f.writelines(f"{en}\t{pt}\n" for en, pt in valid)
    return d, len(train), bad


def _corpora_binding(d) -> str:
    return ("--gin.CORPORA=["
            f"{{'path': '{d}/en-pt.train.tsv.gz', 'src_lang': 'en', 'tgt_lang': 'pt-BR'}}, "
            f"{{'path': '{d}/en-pt.valid.tsv', 'src_lang': 'en', 'tgt_lang': 'pt-BR', "
            "'split': 'validation'}]")


SMALL = ["--gin.TRAIN_STEPS=4", "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=32",
         "--gin.DataConfig.vocab_size=1000", "--gin.DataConfig.vocab_sample_per_lang=1000",
         "--gin.ModelConfig.vocab_size=1024", "--gin.ModelConfig.num_encoder_layers=1",
         "--gin.ModelConfig.num_decoder_layers=1", "--gin.TrainConfig.log_every=2",
         "--gin.TrainConfig.checkpoint_every=4"]


@pytest.mark.slow
def test_trains_on_a_dirty_tsv_and_reports_every_skip(corpus_files, tmp_path, capsys):
    import gin

    d, n_train, n_bad = corpus_files
    model_dir = tmp_path / "model"
    try:
        assert cli.main(["train", "--gin_file=runs/own_corpus.gin", f"--model_dir={model_dir}",
                         _corpora_binding(d), *SMALL]) == 0
    finally:
        gin.clear_config()
    report = json.loads((model_dir / "data_report.json").read_text())
    text = json.dumps(report)
    for reason in ("invalid_utf8", "missing_column", "control_chars"):
        assert f'"{reason}": {n_bad}' in text, (reason, report)
    assert "en-pt.train.tsv.gz:2" in text  # the first bad line, by file:line
    summary = json.loads((model_dir / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["loss"] > 0
    saved = json.loads((model_dir / "jaxmt_config.json").read_text())["data"]
    assert [c["tgt_lang"] for c in saved["corpora"]] == ["pt-BR", "pt-BR"]

    from jaxmt.inference.translator import Translator
    tr = Translator.from_pretrained(str(model_dir))
    out = tr.translate(["In the beginning God created the heaven and the earth."],
                       src_lang="en", tgt_lang="pt-BR")
    assert len(out) == 1 and isinstance(out[0], str)

    # `jaxmt eval` scores the corpus's own validation split, both directions.
    capsys.readouterr()
    assert cli.main(["eval", f"--model_dir={model_dir}", "--split=validation",
                     "--max_examples=4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["directions"]) == {"en-pt-BR", "pt-BR-en"}
    assert all(r["n"] == 4 for r in result["directions"].values())


def test_strict_mode_stops_at_the_first_bad_record(corpus_files, tmp_path):
    import gin

    d, _, _ = corpus_files
    try:
        # The CLI answers with one line: SystemExit("error: ...").
        with pytest.raises(SystemExit, match=r"en-pt.train.tsv.gz:2: invalid_utf8"):
            cli.main(["train", "--gin_file=runs/own_corpus.gin", f"--model_dir={tmp_path}",
                      _corpora_binding(d), *SMALL,
                      "--gin.DataConfig.clean={'strict': True}"])
    finally:
        gin.clear_config()
