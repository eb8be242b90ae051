"""Everything that turns a trained ProCLIP folder into something others use: build, convert, card, push, export."""
