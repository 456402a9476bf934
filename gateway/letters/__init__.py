"""Letters an admin can shape: template files, the customer's language, brands (issue 17).

``templates`` loads and renders the template files shipped in ``gateway/templates/`` (and an
admin's overrides in ``templates_dir``); ``i18n`` writes dates, times, hours and sizes in the
letter's language without the C library's locales; ``language`` chooses that language;
``brands`` says which identity (From, signature, DKIM domain) a ticket's letters carry.
"""
