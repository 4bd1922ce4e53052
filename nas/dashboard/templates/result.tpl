% rebase('base.tpl', title=title)
<h1>{{'Done' if status < 400 else 'Refused'}}</h1>
<p class="flash {{'ok' if status < 400 else 'error'}}" data-field="result">{{body.get('message') or body.get('error') or ''}}</p>
<p>{{!'<a href="/studies/%d">Back to the study</a> · ' % study_id if study_id is not None else ''}}<a href="/">All studies</a></p>
