"""Which Jetson runs which DeepSeek model, how fast, at what power? (the planner's Python API)

    python examples/plan_boards.py [MODEL] [--context N]
"""

import argparse

import edge_sdk
from edge_sdk.planner import bundled_configs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=bundled_configs())
    ap.add_argument("--context", type=int, default=4096)
    args = ap.parse_args()
    print(f"{'model':<32} " + " ".join(f"{b:>15}" for b in edge_sdk.board_names()))
    for model in args.models:
        cells = []
        for board in edge_sdk.board_names():
            p = edge_sdk.plan(model, board, context=args.context)
            best = max(p.modes, key=lambda m: m.decode_tokens_per_s)
            if p.fits:
                cells.append(f"{best.decode_tokens_per_s:>8.1f} tok/s")
            elif p.paged and p.paged["feasible"]:
                cells.append(f"paged {p.paged['decode_tokens_per_s']:>5.2f}/s")
            else:
                cells.append("does not fit")
        print(f"{model:<32} " + " ".join(f"{c:>15}" for c in cells))


if __name__ == "__main__":
    main()
