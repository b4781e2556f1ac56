"""Typer commands: parse, call one function, render. No decisions here."""
