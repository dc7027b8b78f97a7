#!/usr/bin/env python3
"""Convert a BitNet b1.58 Hugging Face checkpoint into the engine's format (once per model)."""

import argparse
import sys
import time

from engine.convert import ConvertError, convert, default_output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python convert_checkpoint.py microsoft/bitnet-b1.58-2B-4T      # download from the hub, then convert\n"
               "  python convert_checkpoint.py ~/models/bitnet-b1.58-2B-4T-bf16  # a local directory\n"
               "\nAccepted sources: 2B-4T (packed uint8 + weight_scale), 2B-4T-bf16 (latent bf16 weights),\n"
               "and 1bitLLM's llama-style bitnet_b1_58 models; single-file or sharded safetensors.\n"
               "The result is written to a temporary folder and renamed only when complete.")
    parser.add_argument("source", help="a local Hugging Face model directory, or a hub repo id")
    parser.add_argument("--output", "-o", help="output directory (default: checkpoints/<source name>)")
    parser.add_argument("--force", action="store_true", help="replace the output directory if it exists")
    args = parser.parse_args(argv)

    output = args.output or default_output(args.source)
    start = time.perf_counter()
    try:
        out = convert(args.source, output, force=args.force)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"converted {args.source} -> {out} in {time.perf_counter() - start:.1f} s")
    print(f"run it with: python generate.py {out.parent if out.parent.name == 'checkpoints' else out} --interactive")
    return 0


if __name__ == "__main__":
    sys.exit(main())
