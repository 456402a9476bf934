"""Every letter the gateway writes, in one package (docs/templates.md).

``headers`` sets the headers every letter carries (From of the ticket's brand, threading,
Auto-Submitted, the loop header); one module per kind of letter composes the bytes:
``ack`` (acknowledgement), ``bundled`` (bundled acknowledgement and owner notification),
``requests`` (the open-requests and daily-cap paragraphs), ``notification`` (letters to
staff and the owner notification), ``handover``, ``staff_reply`` (a staff answer relayed to
the customer), ``notice`` (customer notices and the late message). ``facts`` derives the
facts several letters state from the stored ticket. ``templates`` loads and renders the
template files shipped in ``gateway/templates/`` (and an admin's overrides in
``templates_dir``) and holds the registry ``LETTERS`` that ``rules check`` validates
against; ``i18n`` writes dates, times, hours and sizes in the letter's language;
``language`` chooses that language; ``brands`` says which identity a ticket's letters carry.
"""
