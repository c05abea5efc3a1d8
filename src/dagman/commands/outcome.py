"""``dagman outcome``: treatment-outcome prediction from CT -- time-to-event (linear Cox head, C-index,
Kaplan-Meier risk groups) when the label table has time and event columns, else a binary outcome (the
``dagman classify`` protocol on the label column). The work is in :mod:`dagman.tasks.outcome`."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "outcome prediction: time-to-event (Cox head, C-index, Kaplan-Meier) or binary outcome (AUC), k-fold CV"

DESCRIPTION = """\
Predict a treatment outcome from (pre-treatment) CT with a pretrained encoder.

Time-to-event, when the label CSV has the columns --time-col (default time; follow-up >= 0, any unit) and
--event-col (default event; 1 = event observed, 0 = censored): a linear Cox proportional-hazards head on
frozen features (lp; L2 penalty chosen on validation) or on the fine-tuned encoder (ft), trained by
maximising the Breslow partial likelihood. --folds K cross-validation stratified by event with whole
patients per fold, few-shot --fraction and a validation part as in dagman classify. Out-of-fold risks give
Harrell's C-index with a 95% bootstrap CI; rows above the median risk of their fold's training part form the
high-risk group: Kaplan-Meier curves of both groups and the log-rank p-value go into km.png.

Binary outcome, when the table has no time/event columns or --label-col is given: the dagman classify
protocol on that column (default label): AUC, sensitivity, specificity with CIs, roc.png.

Writes into OUT: metrics.json, predictions.csv, km.png or roc.png (and test_predictions.csv with --test).

examples:
  dagman outcome --labels cohort.csv --checkpoint runs/dagman --out results/os
  dagman outcome --labels cohort.csv --checkpoint runs/dagman --time-col pfs_months --event-col progressed \\
      --out results/pfs
  dagman outcome --labels dcb.csv --checkpoint runs/dagman --label-col dcb6 --out results/dcb
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dagman.commands.classify import add_encoder_arguments, add_protocol_arguments

    parser.add_argument("--labels", required=True, metavar="CSV",
                        help="label table: image + time,event (time-to-event) or image,label (binary)")
    parser.add_argument("--time-col", metavar="NAME", help="follow-up time column (default time; when given, the "
                        "table must have it and the event column)")
    parser.add_argument("--event-col", metavar="NAME", help="event column, 1 = event, 0 = censored (default event)")
    parser.add_argument("--label-col", metavar="NAME",
                        help="binary outcome column (default label); naming it picks the binary outcome even when "
                             "the table also has time/event columns")
    parser.add_argument("--positive", metavar="VALUE", help="binary outcome: the value of the positive class")
    add_encoder_arguments(parser)
    add_protocol_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from dagman.commands.classify import encoder_options, protocol_from_args
    from dagman.tasks.classify import (cohort_from_table, format_table, open_encoder_and_inputs, read_label_table,
                                       run_classification, summary_line)
    from dagman.tasks.outcome import (SurvivalProtocol, format_survival_table, read_survival_columns, run_survival,
                                      survival_summary_line)

    table = read_label_table(args.labels)
    time_col = args.time_col or "time"
    event_col = args.event_col or "event"
    label_col = args.label_col or "label"
    if args.time_col is not None or args.event_col is not None:
        survival = True  # asked for: the columns must be there (table.require below names what is missing)
    elif args.label_col is not None:
        survival = False
    else:
        survival = time_col in table.columns and event_col in table.columns
    base = protocol_from_args(args)
    meta = {"labels_csv": str(Path(args.labels))}

    if not survival:
        cohort = cohort_from_table(table, label_col=label_col, positive=args.positive)
        test = None
        if args.test:
            test = cohort_from_table(read_label_table(args.test), label_col=label_col,
                                     class_names=cohort.class_names)
        encoder, inputs = open_encoder_and_inputs(args.checkpoint, [cohort, test], seed=args.seed,
                                                  **encoder_options(args))
        meta.update({"kind": "binary", "label_column": label_col, "input": inputs})
        result = run_classification(cohort, encoder, base, test=test, device=args.device, out_dir=args.out,
                                    task="outcome", meta=meta)
        print(f"{result['checkpoint']}; {result['feature_source']}; binary outcome {label_col!r}: "
              f"{result['n']} rows ({result['label_balance']['positives']} positive = "
              f"{result['label_balance']['positive_label']!r}); folds: {result['fold_source']}")
        print(format_table(result))
        print(summary_line(result, args.out))
        return 0

    table.require(time_col, event_col)
    protocol = SurvivalProtocol(**{k: getattr(base, k) for k in base.__dataclass_fields__}).check()
    cohort = cohort_from_table(table, label_col=None)
    cohort.time, cohort.event = read_survival_columns(table, time_col, event_col)
    test = None
    if args.test:
        test_table = read_label_table(args.test)
        test = cohort_from_table(test_table, label_col=None)
        test.time, test.event = read_survival_columns(test_table, time_col, event_col)
    encoder, inputs = open_encoder_and_inputs(args.checkpoint, [cohort, test], seed=args.seed,
                                              **encoder_options(args))
    meta.update({"time_column": time_col, "event_column": event_col, "input": inputs})
    result = run_survival(cohort, encoder, protocol, test=test, device=args.device, out_dir=args.out, meta=meta)
    print(f"{result['checkpoint']}; {result['feature_source']}; time-to-event: {result['n']} rows, "
          f"{result['events']} events, {result['censored']} censored; folds: {result['fold_source']}")
    print(format_survival_table(result))
    print(survival_summary_line(result, args.out))
    return 0
