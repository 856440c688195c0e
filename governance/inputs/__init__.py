"""What an audit is made of: the persona catalogue (`personas`), question sets (`questions`),
prompts with located identity tokens (`prompts`) and pinned, hash-checked files from the
package index (`assets`). Torch-free."""
