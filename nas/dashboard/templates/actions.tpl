% running = s['state'] in ('running', 'stopping')
<form class="action" method="post" action="/studies/{{s['id']}}/resume">
<input type="hidden" name="csrf" value="{{csrf}}">
<input type="number" name="trials" min="1" placeholder="{{s['budget'] or ''}}" title="budget of finished trials (blank: keep {{s['budget']}})" aria-label="budget for {{s['name']}}">
<button type="submit" data-action="resume" {{'disabled' if running or not s['resumable'] else ''}}>Resume</button>
</form>
<form class="action" method="post" action="/studies/{{s['id']}}/stop">
<input type="hidden" name="csrf" value="{{csrf}}">
<button type="submit" data-action="stop" {{'' if s['state'] == 'running' else 'disabled'}}>Stop</button>
</form>
<form class="action" method="post" action="/studies/{{s['id']}}/export">
<input type="hidden" name="csrf" value="{{csrf}}">
<button type="submit" data-action="export" {{'' if s['best_trial'] is not None else 'disabled'}}>Export best</button>
</form>
