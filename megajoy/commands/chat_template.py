"""`megajoy chat-template --render FILE`: every conversation of a chat JSONL file exactly as the model
sees it, token by token, with the trained tokens (those with a loss) between ⟦ and ⟧."""

import sys


def add_arguments(parser) -> None:
    parser.add_argument("--render", required=True, metavar="FILE.jsonl", help="chat JSONL to render")
    parser.add_argument("--tokenizer", required=True, metavar="tokenizer.json",
                        help="the tokenizer (the template's special tokens are added when missing)")
    parser.add_argument("--thinking", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--limit", type=int, default=None, help="render only the first N conversations")


def marked_text(tokenizer, sample) -> str:
    """Decoded tokens, each run of trained tokens wrapped in ⟦ ⟧."""
    out, run, trained_run = [], [], None
    for token, trained in zip(sample.ids + [None], sample.trained + [None]):
        if trained != trained_run and run:
            text = tokenizer.decode(run)
            out.append(f"⟦{text}⟧" if trained_run else text)
            run = []
        trained_run = trained
        if token is not None:
            run.append(token)
    return "".join(out)


def run(args) -> int:
    from megajoy.data.chat import ConversationError, render
    from megajoy.data.jsonl import read_jsonl
    from megajoy.data.sft import ChatTokenizer

    tokenizer = ChatTokenizer(args.tokenizer, vocab_size=1 << 30)
    shown = 0
    for number, obj in read_jsonl(args.render):
        if args.limit is not None and shown >= args.limit:
            break
        shown += 1
        try:
            sample = tokenizer.encode(render(obj, args.thinking))
        except ConversationError as e:
            print(f"--- line {number}: skipped in training: {e}\n")
            continue
        trained = sum(sample.trained)
        print(f"--- line {number}: {len(sample.ids)} tokens, {trained} trained")
        print(marked_text(tokenizer, sample) + "\n")
    if tokenizer.added:
        print(f"(added to the tokenizer: {' '.join(tokenizer.added)})", file=sys.stderr)
    return 0
