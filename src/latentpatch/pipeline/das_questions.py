"""The problems of the ``das`` experiment from ``--questions`` (docs/method.md §20.1).

- a **pair file**: the run's path, both sides of every pair with its synthetic program
  (:func:`~latentpatch.pipeline.das.problems_of`);
- **GSM8K / GSM8k-Aug worked solutions**: each question a problem (its group: the record's ``group``,
  else its id), its program the parsed ``<<expression=result>>`` chain
  (:func:`~latentpatch.data.chain.parse_chain`); a question whose chain cannot be used is kept for
  ``answer`` but has no intermediates; how many chains were usable and why the others were not is
  written to ``results/das_chains.json`` (:data:`~latentpatch.names.DAS_CHAINS_FILE`);
- a **question file**: each question a problem without a chain (``answer`` only).

``column:NAME`` needs the clean/corrupted sides of pairs, so only a pair file gives it.
"""

from __future__ import annotations

from collections import Counter

from latentpatch.data.chain import ISSUES, Chain, parse_chain
from latentpatch.data.pairs import load_pairs
from latentpatch.data.questions import LabelledQuestion, QuestionSet, load_questions
from latentpatch.errors import LatentPatchError
from latentpatch.files import write_json
from latentpatch.names import DAS_CHAINS_FILE, DAS_EXPERIMENT
from latentpatch.pipeline.config import RunConfig
from latentpatch.pipeline.das_options import das_variable
from latentpatch.pipeline.manifest import RunContext


def question_chain(q: LabelledQuestion) -> Chain | str:
    """``q``'s chain, or why there is none (an issue of :data:`~latentpatch.data.chain.ISSUES`, or
    ``"no_annotations"``).

    >>> question_chain(LabelledQuestion("a", "a", "2 apples, 3 more, then 4 times", 20, (5, 20),
    ...     annotations=(("2+3", "5"), ("5*4", "20")))).forced(0, 6)
    24
    """
    if not q.annotations:
        return "no_annotations"
    return parse_chain(q.annotations, q.answer, q.question)


def chain_summary(qs: QuestionSet, path: str, variable: str | None) -> tuple[list[Chain | str], dict[str, int]]:
    """Each question's chain (or its issue) and the counts of ``results/das_chains.json``; a
    LatentPatchError naming ``--questions`` when ``variable`` cannot be computed on this set."""
    kind, arg = das_variable(variable)
    if kind == "column":
        raise LatentPatchError(
            f"--das-variable column:{arg} with --questions {path}: a column counterfactual needs pairs "
            "(clean and corrupted sides); fix: pass a pair file, or use intermediate:S or answer"
        )
    chains = [question_chain(q) for q in qs]
    counts = Counter("usable" if isinstance(c, Chain) else c for c in chains)
    summary = {"questions": len(qs), "usable": counts["usable"], "skipped_records": len(qs.skipped)}
    summary |= {name: counts[name] for name in (*ISSUES, "no_annotations")}
    if kind == "intermediate" and not counts["usable"]:
        why = ", ".join(f"{n} {name}" for name, n in summary.items() if name not in ("questions", "usable") and n)
        raise LatentPatchError(
            f"--questions {path}: none of its {len(qs)} questions has a usable <<expression=result>> chain for "
            f"--das-variable intermediate:{arg} ({why}); fix: give GSM8K worked solutions (docs/method.md §20.1) "
            "or use --das-variable answer"
        )
    return chains, summary


def check_das_questions(config: RunConfig) -> None:
    """Before the model loads: the ``das`` variable can be computed on ``--questions`` (one line if not)."""
    if DAS_EXPERIMENT in config.experiments and config.questions:
        qs = load_questions(config.questions, skip_unparsed=bool(config.skip_unparsed))
        if qs.layout != "pairs":
            chain_summary(qs, str(config.questions), config.das_variable)


def question_problems(ctx: RunContext) -> list:
    """The :class:`~latentpatch.pipeline.das.Problem` list of ``--questions`` (module docstring)."""
    from latentpatch.pipeline.das import Problem, problems_of

    config, model = ctx.config, ctx.model
    path = str(config.questions)
    qs = load_questions(path, skip_unparsed=bool(config.skip_unparsed))
    if qs.layout == "pairs":
        return problems_of(model, load_pairs(path))
    chains, summary = chain_summary(qs, path, config.das_variable)
    problems = []
    for q, chain in zip(qs, chains):
        usable = isinstance(chain, Chain) and q.intermediates is not None
        results = tuple(q.intermediates) if usable and q.intermediates is not None else None
        prompt = tuple(model.prompt_ids(q.question))
        problems.append(Problem(prompt, float(q.answer), chain if usable else None, results, q.group, dict(q.labels)))
    write_json(ctx.paths.results / DAS_CHAINS_FILE, summary)
    if summary["usable"] < len(qs):
        ctx.progress.warn(f"das: {summary['usable']} of {len(qs)} questions have a usable chain ({DAS_CHAINS_FILE})")
    return problems
