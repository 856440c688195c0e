"""The answer-format check (governance/audit/answer_format.py) measures what the audit would:
its no-persona accuracy under the audit's own prefix equals the audit's."""


def test_answer_format_accuracy_matches_the_audit(tiny_audit, tokenizer):
    from governance.audit.answer_format import check_answer_formats
    from governance.models.loading import LoadedModel
    from governance.models.tiny import tiny_model, tiny_questions

    model = tiny_model("llama", vocab_size=len(tokenizer))
    loaded = LoadedModel.from_model(model, tokenizer, "tiny")
    table = check_answer_formats(loaded, tiny_questions(), ["The answer is", "Answer:"],
                                 progress=False)
    assert list(table["answer_prefix"]) == ["The answer is", "Answer:"]
    none = tiny_audit.behaviour.set_index("persona").loc["(no persona)"]
    assert table.loc[0, "accuracy"] == none["accuracy"]
    assert ((table["option_mass"] > 0) & (table["option_mass"] < 1)).all()
    assert (table["ci_low"] <= table["accuracy"]).all()
    assert (table["accuracy"] <= table["ci_high"]).all()
    assert (table["n_questions"] == 6).all()
