"""Print the ErrorCode members from the Rust source (to paste into errors.py)."""
import pathlib
import re

src = pathlib.Path(__file__).resolve().parents[3] / "crates/proto/src/error_code.rs"
for code in re.findall(r'^\s+[A-Z][A-Za-z0-9]+ = "([A-Z0-9_]+)",', src.read_text(), re.M):
    print(f'    {code} = "{code}"')
