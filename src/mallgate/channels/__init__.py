"""One module per third party, each speaking its wire protocol. No database here."""
